"""Deep denoising autoencoders on MNIST: a small library that knows nothing about DVC.

Modules: data (IDX files, download), noise, model, train (the one fit loop), evaluate,
experiments (manifold, morphing), figures, tracking (MLflow), params (validation), io (atomic
writes).
"""
