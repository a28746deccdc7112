"""Stage `extract`: a frozen CLIP → the zarr feature store (layout in store/features.py).

run.py: the stage function (``extract``) and its shard loop; config.py: ``ExtractConfig``, every
option, torch-free (the command line builds its options from it); data.py: the image side, shards →
batches → device (``--decode cpu|gpu``); meta.py: what a store records of its making, and the
checkpoint's final.json it starts from (every key checked). Nothing is imported here, so reading
the config imports no torch.
"""
