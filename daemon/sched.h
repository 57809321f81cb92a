/* compatibility until amqp.c is split: include "scheduler.h" instead. */
#include "scheduler.h"
