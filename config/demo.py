# The MedJEPA objective on the demo data: masked latent prediction + SIGReg on the built-in synthetic
# data set (64 px). medjepa.py's defaults, stated for reading and editing, except views_from: the second
# view is another photo of each lesion (the demo has three), not a second crop of the image itself.
# ~7 minutes on 2 CPU cores.   python medjepa.py config/demo.py
out_dir = 'out-demo'
data_dir = 'data/demo'
objective = 'mask'
sigreg_on = 'pooled_std'   # SIGReg on batch-standardised per-image context vectors (docs/design.md)
max_iters = 600
warmup_iters = 60
eval_interval = 200
num_slices = 1024          # SIGReg directions per step: better than 256 on both seeds measured (docs/sigreg.md)
context_keep = 0.33        # every image's context: 21 of the 64 patches, whatever the batch size (docs/masking.md)
learning_rate = 2.5e-4     # peak AdamW rate: on val, better than 1e-3 on every seed (docs/design.md)
num_targets = 2            # target blocks per image: on val, 2 beat I-JEPA's 4 on every seed (docs/design.md)
views_from = 'group'       # the second view: its own crop of another photo of the lesion (train_groups.npy)
inv_weight = 0.1           # pooled invariance to it: on val, +8 kNN / +5 linear over inv_weight=0 (docs/design.md)
