# ViT-Tiny/16 at 224 px with a 6 x 384 predictor: the size an earlier MedJEPA implementation was timed
# at (bench.py's 'ref' preset). Needs 224 px data:  python prepare.py demo --size=224 --out=data/demo224
out_dir = 'out-vit-tiny-224'
data_dir = 'data/demo224'
image_size = 224
patch_size = 16
n_embd = 192
n_layer = 12
n_head = 3
pred_n_embd = 384
pred_n_layer = 6
pred_n_head = 6
batch_size = 16
local_size = 96
knn_train_size = 2000
