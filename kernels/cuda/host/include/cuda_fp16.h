// NVRTC's cuda_fp16.h on the host harness: __half and its conversions (cuda_host.h).
#pragma once
#include "../cuda_host.h"
