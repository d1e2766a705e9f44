"""What the RegularizedMultimodalVI tests share: the small model and the quick training settings."""

SMALL = dict(n_latent=5, n_hidden=32)
FIT = dict(batch_size=128, lr=1e-2, kl_warmup_epochs=3, early_stopping=False, device="cpu", progress_bar=False)
