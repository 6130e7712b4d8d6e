# HAM10000 dermoscopy (python prepare.py ham10000: 224 px, splits by lesion) with medjepa.py's defaults,
# the masked objective, at ViT-Tiny/16 patch size. Not measured on the real data yet: a CPU sweep on the
# 64-px demo chose these defaults (docs/design.md); on real images, check the online kNN on val in the log.
#   python medjepa.py config/ham10000.py        then    python eval.py --ckpt=out-ham10000/ckpt.pt
out_dir = 'out-ham10000'
data_dir = 'data/ham10000'
image_size = 224
patch_size = 16
local_size = 96            # ('views' objective only) a multiple of patch_size
# With --objective=views, --views_from=group pairs photos of one lesion_id (prepare.py writes them as
# groups): the recipe of config/demo_views.py, measured on the demo only (docs/results.md). For this
# masked objective, --views_from=group makes the pooled second view (inv_weight) another photo of the
# lesion instead of the image's own second crop, as config/demo.py does (on the demo's val: +10 kNN,
# +4 linear over the own crop; docs/design.md). A lesion photographed once pairs with its own crop.
