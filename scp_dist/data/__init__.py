"""The data path after the shards: plan -> reader -> augmentation -> batches (docs/DESIGN.md)."""
