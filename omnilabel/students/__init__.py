"""The Mask2Former student: trained on ground truth plus pseudomasks, then run over new images.

Modules: ``mask2former`` (architecture, presets, pretrained weights, model build), ``loss`` (Mask2Former's
loss with a weight per target), ``data`` (which annotations count, augmentation, batches), ``run`` (the
recipe, the run directory, checkpoints, loading a trained student), ``loop`` (the training loop, in-process
or one DDP worker), ``train`` (the ``train-student`` entry point and its display; under Ray Train the loop
runs through ``omnilabel.jobs.train_student``), ``inference`` (batched forward passes and
post-processing), ``predict`` (the per-image work of the ``predict`` job, ``omnilabel.jobs.predict``).
"""
