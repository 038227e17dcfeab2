"""The Mask2Former student: trained on ground truth plus pseudomasks, then run over new images.

Modules: ``mask2former`` (configuration, presets, model build, pretrained weights, checkpoints), ``loss``
(Mask2Former's loss with a weight per target), ``data`` (samples, augmentation, batches), ``train`` (the
training loop and the run directory), ``ray_train`` (the same loop under Ray Train), ``predict`` (inference
as a resumable per-image job).
"""
