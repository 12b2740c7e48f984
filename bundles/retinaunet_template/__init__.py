"""The Retina U-Net bundle template: configs with plan placeholders, scripts, docs."""
