"""Lung segmentation: `isnet segment train` (a MONAI U-Net on image + mask pairs) and `isnet segment`
(masks for new images, post-processed and quality-checked). `SegmentConfig` imports without torch."""
