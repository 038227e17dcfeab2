"""Teachers: foundation models (SAM, Grounding DINO, CLIP) that turn weak labels into pseudomasks."""
