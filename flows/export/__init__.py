"""Built stages exported for other trainers' loaders: the driver (stage), one shard's export as
an executor task (shard), one module per target format (vita, llava) and the media writing they
share (media). May import schemas and storage only: the executor is passed in.
"""
