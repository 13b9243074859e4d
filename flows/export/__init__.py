"""A built stage exported for other trainers' loaders: the driver (stage), one module per
target format (vita, llava) and the media writing they share (media).
May import schemas and storage only."""
