// C API of arkv_local's additions to libllama (the tri-state KV memory lives beside it).
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

    // Identifies a libllama built by arkv_local: "arkv_local <version> (llama.cpp <build>)".
    LLAMA_API const char * llama_arkv_version(void);

#ifdef __cplusplus
}
#endif
