#include "llama-arkv.h"

#include <string>

#ifndef ARKV_LOCAL_VERSION
#define ARKV_LOCAL_VERSION "dev"
#endif

const char * llama_arkv_version(void) {
    static const std::string version =
        std::string("arkv_local ") + ARKV_LOCAL_VERSION + " (llama.cpp " + llama_version() + ")";
    return version.c_str();
}
