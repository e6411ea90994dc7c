// Reading the hyperparameters (implementation generated from codegen/v4.py into
// native/generated/hparams.cpp).
#pragma once

#include "dsv4.h"
#include "gguf_file.h"

namespace dsv4 {

// Fills `hp` from the metadata of `f` and checks it; throws dsv4::Error naming the key.
void read_hparams(const GgufFile & f, dsv4_hparams & hp);

}  // namespace dsv4
