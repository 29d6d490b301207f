"""SWEEP is a plain dict."""
SWEEP = {"name": "dict_sweep", "space": {"model.arch": "vgg11"}}
