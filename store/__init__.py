"""Reading and writing the pipeline's data: webdataset shards and the zarr feature store."""
