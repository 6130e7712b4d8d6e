# The README's demo: masked latent prediction + SIGReg on the built-in synthetic data set (64 px).
# ~10 minutes on 2 CPU cores.   python medjepa.py config/demo.py
out_dir = 'out-demo'
data_dir = 'data/demo'
objective = 'mask'
