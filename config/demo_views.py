# LeJEPA's own multi-view objective on the demo data, for a side-by-side comparison with config/demo.py.
# 7-10 minutes on 2 CPU cores with bf16 autocast (444 s at a median 132 images/s on a 2-core AMD EPYC), ~11 in
# float32 (~84 images/s; docs/results.md).   python medjepa.py config/demo_views.py
# Strong colour jitter + random grayscale remove the colour shortcut (docs/design.md: without them the
# encoder tells images apart by skin tone and darkness and learns no morphology). No local crops: on val,
# 2 local crops of 20-60 % gave 41.1 / 48.2 / 41.6 % online kNN on seeds 0 / 1 / 2 and none gave 43.5 / 52.7 /
# 41.3, at 12 % less time per step (docs/design.md). Each global view's encoder
# sees a random half of its patches (view_keep): a step costs ~55 % as much, so 1,100 steps take the time of
# 600 full ones; on val this gave 48.9 / 46.7 / 48.4 % online kNN on seeds 0 / 1 / 2 against 43.5 / 52.7 / 41.3.
# The global views are cut from the three photos of the lesion, one each (views_from='group' with
# n_global_views = 3, the train_groups.npy of the data; 810 steps: on one thread the time of 1,100 steps of two
# views, on two threads 19 % more): on val,
# linear probe 74.1 / 75.6 / 75.2 % and online kNN 58.0 / 58.6 / 56.3 % on seeds 0 / 1 / 2, against 70.0 / 73.3 / 73.6
# and 55.6 / 58.0 / 57.1 with two views (the first photo and one other) for 1,100 steps, and 47.7 / 52.5 / 49.5 % kNN
# with both views from one photo (docs/design.md). Data without groups: --views_from=image --n_global_views=2
# --max_iters=1100, the measured one-photo recipe.
out_dir = 'out-demo-views'
data_dir = 'data/demo'
objective = 'views'
n_local_views = 0
color_jitter = 0.8
gray_prob = 0.2
view_keep = 0.5
views_from = 'group'
n_global_views = 3
max_iters = 810
warmup_iters = 60
learning_rate = 1e-3        # this recipe's measured rate (medjepa.py's 2.5e-4 was chosen for 'mask')
eval_interval = 200
num_slices = 1024          # SIGReg directions per step: on val, online kNN 58.6 / 60.8 / 60.5 % on seeds 0 / 1 / 2
                           # against 55.7 / 58.9 / 59.7 with 256, val linear 74.9 / 75.6 / 75.2 against 70.7 / 74.0 / 71.3
                           # (docs/design.md), for ~4 % more time per step (bench.py, 2 threads: median
                           # 471 ms against 452)
proj_dim = 128             # projector output width (hidden 4x): on val, online kNN 62.0 / 62.3 / 61.3 % on seeds
                           # 0 / 1 / 2 against 58.6 / 60.8 / 60.5 with 64, val linear 77.1 / 76.3 / 74.0 against
                           # 74.9 / 75.6 / 75.2 (docs/design.md), at the same images/s
