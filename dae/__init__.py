"""Deep denoising autoencoders on MNIST: a small library that knows nothing about DVC.

Modules: data (IDX files, download), noise, splits (the noisy split files), model, train (the one
fit loop), finetune (the slide's models trained end to end), evaluate (the table's metrics),
analysis (latent space, manifold, morphing), figures, report (tables, the report page),
checkpoint, device, tracking (MLflow: runs, store, registry), params (validation, allowed
values), env (DAE_* switches), io (atomic writes, digests), compare and team (command-line tools).
"""
