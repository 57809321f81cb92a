/*
 * amqp_harness.h - what the transport's fuzz targets link: the pure
 * conversions of daemon/amqp_fields.c (headers_flatten, uri_mask,
 * copy_properties) and nothing that opens a socket.
 */
#ifndef OCCAMY_FUZZ_AMQP_HARNESS_H
#define OCCAMY_FUZZ_AMQP_HARNESS_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amqp_fields.h"
#include "log.h"

#define COMMAND_HEADER "x-occamy-command"
#define REASON_MAX 256

#endif
