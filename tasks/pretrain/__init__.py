"""Pretraining of the tiny demo backbones that are not pretrained through ``train.py`` (the tiny CLIP),
and the measurement that picked the CLIP demo's domain shift."""
