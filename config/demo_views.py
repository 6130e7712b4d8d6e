# LeJEPA's own multi-view objective on the same data, model and budget as config/demo.py, for a
# side-by-side comparison.   python medjepa.py config/demo_views.py
out_dir = 'out-demo-views'
data_dir = 'data/demo'
objective = 'views'
