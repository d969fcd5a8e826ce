// Everything in optim/: optimizers, gradient clipping, learning-rate schedules.
#pragma once

#include "optim/adam.h"
#include "optim/clip.h"
#include "optim/grad_scaler.h"
#include "optim/optimizer.h"
#include "optim/schedule.h"
#include "optim/sgd.h"
