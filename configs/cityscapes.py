"""Cityscapes (gtFine, 19 classes; train 2,975 / val 500), the official MGD / CPS recipes.

  python -m mgd_jax.main --config=configs/cityscapes.py:method=cps,teacher=resnet101,partition=8 ...
  python -m mgd_jax.main --config=configs/cityscapes.py:method=mgd,student=resnet18,partition=8 ...

Arguments as in configs/voc.py. Every number is the official one (docs/method.md §4.1, §4.6), with
its origin; where the official repo has no config (MobileNetV2 on Cityscapes) the choice is ours
and says so.
"""

from mgd_jax import config_lib


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(
        arg, method="mgd", student="resnet18", teacher="resnet101", partition=8, smoke=False
    )
    c = config_lib.base_config()
    c.method = a.method
    c.dataset = "mgd_cityscapes"
    c.train_split = "train"
    c.eval_split = "val"
    c.num_classes = 19
    c.partition = a.partition
    c.crop_size = 800  # config.image_height / image_width
    c.num_epochs = config_lib.CITYSCAPES_EPOCHS.get(a.partition, 137)  # 137 for 1/8
    c.eval.mode = "sliding"  # 800 windows, stride ceil(800 * 2/3) = 534, summed logits (§4.7)
    c.eval.pad_to = (1024, 2048)
    c.eval.crop = 800
    c.eval.stride_rate = 2 / 3
    c.eval.batch_size = 8
    c.eval_every = 1000
    c.loss.ohem = True  # ProbOhemCrossEntropy2d for L_sup (city train.py)
    c.loss.ohem_thresh = 0.7

    # Student: exp.city/city8.resnet18_deeplabv3plus — 8 GPUs x 2, lr 0.02 NOT scaled by world
    # size but the loss is divided by it: lr_eff = 0.02 / 8, wd_eff = 8 x 1e-4 (§4.1).
    c.student = a.student
    c.batch_size = 16
    c.replica_batch = 2
    c.lr = 0.0025
    c.weight_decay = 8e-4
    c.loss.ohem_min_kept = 100000  # per GPU: 50000 * batch_size 16 // 8 GPUs
    if a.student == "resnet18":
        c.loss.lambda_image, c.loss.lambda_region = 0.001, 100.0  # city8 R18 config.py
    elif a.student == "mobilenet_v2":
        # No official Cityscapes MobileNetV2 config: our choice is the VOC MobileNetV2 λ's
        # with the Cityscapes ResNet-18 schedule [UNVERIFIED against the paper].
        c.loss.lambda_image, c.loss.lambda_region = 0.0005, 50.0
    else:
        raise ValueError(f"student={a.student!r}: expected resnet18 or mobilenet_v2")

    if a.method == "cps":
        # exp.city/city8.{resnet101,wresnet34}: 8 GPUs x 1, lr 0.02 unscaled -> lr_eff 0.0025,
        # cps_weight 5, OHEM min_kept 50000 * 8 // 8 per GPU.
        c.cps.backbone = "wide_resnet50_2" if a.teacher == "wide_resnet34_2" else a.teacher
        c.batch_size = 8
        c.replica_batch = 1
        c.lr = 0.0025
        c.cps.weight = 5.0
        c.loss.ohem_min_kept = 50000
    if a.smoke:
        config_lib.apply_smoke(c)
    return c
