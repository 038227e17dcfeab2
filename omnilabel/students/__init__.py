"""The Mask2Former student: trained on ground truth plus pseudomasks, then run over new images.

Modules: ``mask2former`` (architecture, presets, pretrained weights, model build), ``loss`` (Mask2Former's
loss with a weight per target), ``data`` (which annotations count, augmentation, batches), ``run`` (the
recipe, the run directory, checkpoints, loading a trained student), ``loop`` (the training loop, in-process
or one DDP worker: the ``train-student`` job, ``omnilabel.jobs.train_student``, runs it here or on Ray
Train), ``inference`` (batched forward passes and post-processing), ``predict`` (the per-image work of the
``predict`` job, ``omnilabel.jobs.predict``). Nothing here imports Ray, rich or ``omnilabel.jobs``.
"""
