"""Model loading: named weights, and checkpoint loaders for SAM, Grounding DINO and CLIP."""
