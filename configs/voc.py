"""PASCAL VOC 2012 (+SBD, train_aug 10,582 / val 1,449), the official MGD / CPS recipes.

  python -m mgd_jax.main --config=configs/voc.py:method=cps,teacher=resnet101,partition=8 ...
  python -m mgd_jax.main --config=configs/voc.py:method=mgd,student=resnet18,partition=8 \
      --config.teacher_deep.checkpoint=DIR --config.teacher_wide.checkpoint=DIR ...

Arguments: method (supervised | cps | mgd), student (resnet18 | mobilenet_v2), teacher (the CPS
backbone: resnet101 | wide_resnet50_2), partition (16 | 8 | 4 | 2), smoke. Every number below is the
official one (docs/method.md §4), with its origin.
"""

from mgd_jax import config_lib

# Per student: (effective lr, λ1, λ2) from exp.voc/voc8.{resnet18,mobilev2}_deeplabv3plus:
# script.sh learning_rate (lr_eff = config lr, §4.1) and config.py lambda_1 / lambda_2.
STUDENTS = {
    "resnet18": (0.0025, 0.002, 100.0),
    "mobilenet_v2": (0.0035, 0.0005, 50.0),
}
# CPS teachers: script.sh learning_rate of exp.voc/voc8.{resnet101,wresnet34}_deeplabv3plus.
TEACHER_LR = {"resnet101": 0.0025, "wide_resnet50_2": 0.001}


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(
        arg, method="mgd", student="resnet18", teacher="resnet101", partition=8, smoke=False
    )
    c = config_lib.base_config()
    c.method = a.method
    c.dataset = "mgd_voc_aug"
    c.train_split = "train_aug"
    c.eval_split = "val"
    c.num_classes = 21
    c.partition = a.partition
    c.crop_size = 512  # config.image_height / image_width
    c.batch_size = 8  # global: 4 GPUs x 2 (script.sh batch_size=8)
    c.replica_batch = 2
    c.weight_decay = 4e-4  # 4 GPUs x 1e-4: the loss / world_size scaling quirk (§4.1)
    c.num_epochs = config_lib.VOC_EPOCHS.get(a.partition, 34)  # 34 for 1/8 (config.nepochs)
    c.eval.mode = "whole"  # images <= 500 px: pad to 512, one forward (§4.7)
    c.eval.pad_to = (512, 512)
    c.eval.crop = 512
    c.eval.batch_size = 8
    c.eval_every = 2000
    c.checkpoint_every = 1000

    if a.student not in STUDENTS:
        raise ValueError(f"student={a.student!r}: expected one of {sorted(STUDENTS)}")
    c.student = a.student
    c.lr, c.loss.lambda_image, c.loss.lambda_region = STUDENTS[a.student]

    if a.method == "cps":
        teacher = "wide_resnet50_2" if a.teacher == "wide_resnet34_2" else a.teacher
        if teacher not in TEACHER_LR:
            raise ValueError(f"teacher={a.teacher!r}: expected one of {sorted(TEACHER_LR)}")
        c.cps.backbone = teacher
        c.cps.weight = 1.0  # exp.voc config.py cps_weight
        c.lr = TEACHER_LR[teacher]
    if a.smoke:
        config_lib.apply_smoke(c)
    return c
