//! easel-core: the request schema, validation and defaults, and the image
//! codecs. No tensors, no network.
