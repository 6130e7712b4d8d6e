# LeJEPA's own multi-view objective on the demo data, for a side-by-side comparison with config/demo.py.
# 11 minutes on 2 CPU cores in bf16 (~65 images/s), ~20 in float32 (~32).   python medjepa.py config/demo_views.py
# Strong colour jitter + random grayscale remove the colour shortcut (docs/design.md: without them the
# encoder tells images apart by skin tone and darkness and learns no morphology); 2 local crops keep
# the step cheap enough for 600 steps in the CPU budget; they cover 20-60 % of the image, so they nearly
# always show part of the lesion (5-30 % crops often show skin only: docs/design.md).
out_dir = 'out-demo-views'
data_dir = 'data/demo'
objective = 'views'
n_local_views = 2
color_jitter = 0.8
gray_prob = 0.2
local_scale = (0.2, 0.6)    # area of the local crops (online kNN on val at step 400: 39.7 % vs 25.8 % with (0.05, 0.3))
max_iters = 600
warmup_iters = 60
eval_interval = 200
num_slices = 256           # the setting of this objective's measured results (1024 is measured for 'mask' only)
