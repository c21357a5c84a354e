"""The bundled example: CT-pretrained model fine-tuned on MR with AC-Norm and vanilla (``nnUNetv2_acnorm_demo``)."""
