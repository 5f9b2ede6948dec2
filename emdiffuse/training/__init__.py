"""Training: chunked patch loader, augmentation, degradations, registration, trainer, synthetic EM."""
