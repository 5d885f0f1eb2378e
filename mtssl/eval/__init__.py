"""Transfer evaluation of pre-trained trunks (ImageNet-style linear probe, PASCAL VOC detection,
NYU depth) and the report of transfer performance against pre-training GPU-hours.

Nothing heavy is imported here: the CLI (`mtssl.cli.eval`) imports SUITES to build its parser.
"""

SUITES = ("imagenet", "pascal", "nyu")
