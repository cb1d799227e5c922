//! InceptionV3 in tch (torchvision and tf2015 variants), weights, trainable policies, optimizers.
