"""Bulk embedding: datasets and files embedded on Ray Data with the online service's preprocessing and encoder code.

`dataset.py` is the pipeline (rows in, embeddings out, reusable by any bulk front end), `sources.py` the readers
of images folders, Parquet and WebDataset tars, and `cli.py` the `clip-embed` command. Importing the package loads
neither torch nor ray.
"""
