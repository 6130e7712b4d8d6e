# brainlobes (python prepare.py brainlobes: 64-px patches of one real brain MRI, 7 lobes) with the demo's
# `views` recipe minus its colour jitter and grayscale: on a grey MRI they only hide the tissue
# intensities that tell grey from white matter. Measured in docs/results.md (real images, brainlobes).
#   python medjepa.py config/brainlobes.py      then    python eval.py --ckpt=out-brainlobes-views/ckpt.pt
out_dir = 'out-brainlobes-views'
data_dir = 'data/brainlobes'
objective = 'views'
n_local_views = 0
color_jitter = 0.0
gray_prob = 0.0
view_keep = 0.5
max_iters = 1100
warmup_iters = 60
learning_rate = 1e-3        # this recipe's measured rate (medjepa.py's 2.5e-4 was chosen for 'mask')
eval_interval = 200
num_slices = 256           # 1,024 (the demo's) was mixed on val here: online kNN 69.1 / 76.3 / 76.2 % on seeds
                           # 0 / 1 / 2 against 71.5 / 72.7 / 73.6, linear 76.6 / 80.3 / 78.4 against 78.2 / 75.7 / 78.6 (docs/design.md)
proj_dim = 64              # the demo's 128 was mixed on val here: online kNN 70.9 / 71.4 % on seeds 0 / 1 against
                           # 71.5 / 72.7, linear 79.6 / 78.5 against 78.2 / 75.7 (docs/design.md)
