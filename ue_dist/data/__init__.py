"""WebDataset shards on any fsspec URL: schema, reading, atomic writing, converters."""
