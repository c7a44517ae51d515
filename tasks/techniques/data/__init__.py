"""Data: the split folder every stage reads (data.py), the sources that write it (tables, images, texts via sources.py), splitting, loading, sampling, augmentation."""
