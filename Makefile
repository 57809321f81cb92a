# occamy - build, test, install.  GNU make.
#
#   make            build daemon, occamyctl, plugins, tests into $(B)/
#   make test       install missing deps, run unit + integration tests
#   make asan/tsan  the same test run under sanitizers (own build dirs)
#   make run        private broker + occamyd + one sample request
#   make install    PREFIX=/usr/local DESTDIR=
#   make deb        Debian packages occamyd, occamy-plugin-dev into $(B)/deb/

PREFIX     ?= /usr/local
SYSCONFDIR ?= /etc
BINDIR     ?= $(PREFIX)/bin
SBINDIR    ?= $(PREFIX)/sbin
LIBDIR     ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
MANDIR     ?= $(PREFIX)/share/man
PLUGINDIR  ?= $(LIBDIR)/occamy/plugins
UNITDIR    ?= $(LIBDIR)/systemd/system
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig

VERSION := 0.1.0
B       ?= build

CC      ?= cc
CFLAGS  ?= -O2 -g
WARN    := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes \
           -Wmissing-prototypes -Wformat=2 -Wpointer-arith -Wno-format-nonliteral
CPPFLAGS_ALL := -std=c11 -D_GNU_SOURCE -Iinclude -iquote daemon \
           -DOCCAMY_VERSION='"$(VERSION)"' \
           -DOCCAMY_PLUGIN_DIR='"$(PLUGINDIR)"' \
           -DOCCAMY_CONFIG_PATH='"$(SYSCONFDIR)/occamy/occamy.ini"' \
           $(CPPFLAGS)
ALL_CFLAGS := $(CPPFLAGS_ALL) $(WARN) -pthread -MMD -MP $(SAN) $(CFLAGS)
ALL_LDFLAGS := -pthread $(SAN) $(LDFLAGS)
LIBS    := -lrabbitmq -linih -lsystemd -lmicrohttpd -ldl -lm

# The daemon's modules; main.c stays out of the library so unit tests link
# everything else.
CORE_SRC := $(filter-out daemon/main.c,$(wildcard daemon/*.c))
CORE_OBJ := $(CORE_SRC:%.c=$(B)/%.o)

UNIT_SRC  := $(wildcard tests/unit/test_*.c)
UNIT_BIN  := $(UNIT_SRC:tests/unit/%.c=$(B)/tests/unit/%)

# Plugins: plugins/NAME.c or plugins/NAME/*.c -> NAME.so; likewise tests/plugins.
PLUGIN_SINGLE := $(wildcard plugins/*.c)
PLUGIN_DIRS   := $(patsubst %/,%,$(sort $(dir $(wildcard plugins/*/*.c))))
PLUGINS := $(PLUGIN_SINGLE:plugins/%.c=$(B)/plugins/%.so) \
           $(PLUGIN_DIRS:plugins/%=$(B)/plugins/%.so)
TPLUGIN_SRC := $(wildcard tests/plugins/*.c)
TPLUGINS := $(TPLUGIN_SRC:tests/plugins/%.c=$(B)/tests/plugins/%.so)

CTL_SRC := $(wildcard ctl/*.c)
TOOLS_SRC := $(wildcard tests/tools/*.c bench/*.c)
TOOLS := $(patsubst %.c,$(B)/%,$(TOOLS_SRC))

PROGS := $(B)/occamyd
ifneq ($(CTL_SRC),)
PROGS += $(B)/occamyctl
endif

# Plugins are built exactly as a user would: only the public header.
PLUGIN_CFLAGS := -std=c11 -D_GNU_SOURCE -Iinclude $(CPPFLAGS) $(WARN) -fPIC -pthread -MMD -MP $(SAN) $(CFLAGS)

.PHONY: all progs test unit asan tsan valgrind run bench install uninstall clean deps deb FORCE
all: $(PROGS) $(PLUGINS) $(TPLUGINS) $(UNIT_BIN) $(TOOLS)
# What is installed, and nothing that needs the test libraries.
progs: $(PROGS) $(PLUGINS)

# Every compile-time setting (PREFIX and the paths built into the daemon,
# CC, CFLAGS, SAN, LDFLAGS) is written to $(B)/BUILD-FLAGS, as git does with
# GIT-CFLAGS. The file is rewritten only when a setting changes, and every
# object and link depends on it, so `make PREFIX=/usr` after `make`
# rebuilds instead of keeping the old compiled-in paths.
BUILD_FLAGS := $(CC) $(ALL_CFLAGS) | $(PLUGIN_CFLAGS) | $(ALL_LDFLAGS) $(LIBS)
$(B)/BUILD-FLAGS: FORCE
	@mkdir -p $(@D)
	@printf '%s\n' '$(subst ','\'',$(BUILD_FLAGS))' >$@.new; \
	if cmp -s $@ $@.new; then rm -f $@.new; else \
	  [ ! -e $@ ] || echo "build settings changed: rebuilding $(B)/"; mv -f $@.new $@; fi

# Objects made only through a chain of pattern rules would be deleted as
# intermediate, then rebuilt by the next make once their .d files name them.
.SECONDARY: $(UNIT_BIN:%=%.o) $(TOOLS:%=%.o)

$(B)/%.o: %.c $(B)/BUILD-FLAGS
	@mkdir -p $(@D)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

$(B)/occamyd: $(B)/daemon/main.o $(CORE_OBJ)
	$(CC) $(ALL_LDFLAGS) -rdynamic -o $@ $^ $(LIBS)

$(B)/occamyctl: $(CTL_SRC:%.c=$(B)/%.o) $(B)/daemon/config.o $(B)/daemon/config_keys.o $(B)/daemon/config_uri.o $(B)/daemon/log.o
	$(CC) $(ALL_LDFLAGS) -o $@ $^ -lrabbitmq -linih -lm

$(B)/tests/unit/%: $(B)/tests/unit/%.o $(CORE_OBJ)
	$(CC) $(ALL_LDFLAGS) -o $@ $^ $(LIBS) -lcmocka

# The transport alone, with a fake scheduler (tests/tools/amqp_smoke.c).
TRANSPORT_OBJ := $(patsubst %.c,$(B)/%.o,$(wildcard daemon/transport*.c) \
	daemon/ack_window.c daemon/amqp_fields.c daemon/backoff.c daemon/clock.c daemon/log.c \
	daemon/config.c daemon/config_keys.c daemon/config_uri.c daemon/records.c)
$(B)/tests/tools/amqp_smoke: $(B)/tests/tools/amqp_smoke.o $(TRANSPORT_OBJ)
	$(CC) $(ALL_LDFLAGS) -o $@ $^ $(LIBS)

$(B)/bench/records_micro: $(B)/bench/records_micro.o $(B)/daemon/records.o \
	$(B)/daemon/clock.o $(B)/daemon/log.o
	$(CC) $(ALL_LDFLAGS) -o $@ $^

$(B)/tests/tools/% $(B)/bench/%: ALL_LIBS := $(LIBS)
$(B)/tests/tools/%: $(B)/tests/tools/%.o
	$(CC) $(ALL_LDFLAGS) -o $@ $^ $(LIBS)
$(B)/bench/%: $(B)/bench/%.o
	$(CC) $(ALL_LDFLAGS) -o $@ $^ $(LIBS)

$(B)/plugins/%.so: plugins/%.c $(B)/BUILD-FLAGS
	@mkdir -p $(@D)
	$(CC) $(PLUGIN_CFLAGS) -shared -o $@ $< $(SAN) $(LDFLAGS) -lm
.SECONDEXPANSION:
$(B)/plugins/%.so: $$(wildcard plugins/%/*.c) $$(wildcard plugins/%/*.h) $(B)/BUILD-FLAGS
	@mkdir -p $(@D)
	$(CC) $(PLUGIN_CFLAGS) -shared -o $@ $(filter %.c,$^) $(SAN) $(LDFLAGS) -lm
$(B)/tests/plugins/%.so: tests/plugins/%.c $(B)/BUILD-FLAGS
	@mkdir -p $(@D)
	$(CC) $(PLUGIN_CFLAGS) -shared -o $@ $< $(SAN) $(LDFLAGS) -lm

deps:
	@scripts/deps

test: deps
	$(MAKE) all
	tests/run $(B)

unit: all
	tests/run --unit-only $(B)

asan: deps
	$(MAKE) B=build-asan SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" all
	OCCAMY_SANITIZER=asan tests/run build-asan

tsan: deps
	$(MAKE) B=build-tsan SAN="-fsanitize=thread -fno-omit-frame-pointer" all
	OCCAMY_SANITIZER=tsan tests/run build-tsan

# The integration suite with every daemon under valgrind memcheck: a leak
# or invalid access makes the daemon exit 99 and its test fail.
valgrind: deps
	$(MAKE) all
	OCCAMY_SANITIZER=valgrind OCCAMY_TEST_FILTER='$(or $(FILTER),test_daemon)' \
	OCCAMY_TEST_WRAPPER="valgrind -q --error-exitcode=99 --leak-check=full \
	  --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect \
	  --suppressions=$(CURDIR)/tests/valgrind.supp" tests/run $(B)

run: deps
	$(MAKE) all
	scripts/run-demo $(B)

bench: deps
	$(MAKE) all
	bench/run $(B)

install: all
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(BINDIR) $(DESTDIR)$(PLUGINDIR) \
	  $(DESTDIR)$(INCLUDEDIR)/occamy $(DESTDIR)$(PKGCONFIGDIR) \
	  $(DESTDIR)$(SYSCONFDIR)/occamy $(DESTDIR)$(UNITDIR) \
	  $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man5 \
	  $(DESTDIR)$(MANDIR)/man7 $(DESTDIR)$(MANDIR)/man8
	install -m 755 $(B)/occamyd $(DESTDIR)$(SBINDIR)/occamyd
	if [ -x $(B)/occamyctl ]; then install -m 755 $(B)/occamyctl $(DESTDIR)$(BINDIR)/occamyctl; fi
	for p in $(PLUGINS); do install -m 755 $$p $(DESTDIR)$(PLUGINDIR)/; done
	install -m 644 include/occamy/plugin.h $(DESTDIR)$(INCLUDEDIR)/occamy/plugin.h
	sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|g' \
	    -e 's|@PLUGINDIR@|$(PLUGINDIR)|g' -e 's|@VERSION@|$(VERSION)|g' \
	    conf/occamy-plugin.pc.in > $(DESTDIR)$(PKGCONFIGDIR)/occamy-plugin.pc
	if [ ! -e $(DESTDIR)$(SYSCONFDIR)/occamy/occamy.ini ]; then \
	  sed -e 's|^plugin_dir = .*|plugin_dir = $(PLUGINDIR)|' conf/occamy.ini > $(DESTDIR)$(SYSCONFDIR)/occamy/occamy.ini; \
	  chmod 644 $(DESTDIR)$(SYSCONFDIR)/occamy/occamy.ini; fi
	for u in occamyd.service occamyd@.service; do \
	  [ -f systemd/$$u.in ] || continue; \
	  sed -e 's|@SBINDIR@|$(SBINDIR)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' \
	    systemd/$$u.in > $(DESTDIR)$(UNITDIR)/$$u; done
	for m in man/*.[1-8]; do [ -f "$$m" ] || continue; s=$${m##*.}; \
	  install -m 644 $$m $(DESTDIR)$(MANDIR)/man$$s/; done

uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/occamyd $(DESTDIR)$(BINDIR)/occamyctl \
	  $(DESTDIR)$(INCLUDEDIR)/occamy/plugin.h $(DESTDIR)$(PKGCONFIGDIR)/occamy-plugin.pc \
	  $(DESTDIR)$(UNITDIR)/occamyd.service $(DESTDIR)$(UNITDIR)/occamyd@.service
	rm -f $(addprefix $(DESTDIR)$(PLUGINDIR)/,$(notdir $(PLUGINS)))
	for m in man/*.[1-8]; do [ -f "$$m" ] || continue; s=$${m##*.}; \
	  rm -f $(DESTDIR)$(MANDIR)/man$$s/$${m##*/}; done
	-rmdir $(DESTDIR)$(INCLUDEDIR)/occamy $(DESTDIR)$(PLUGINDIR) 2>/dev/null

# Debian packages, built by dpkg-buildpackage from a copy of the tree in
# $(B)/deb/ (it writes into the source tree and its parent directory).
DEB_SRC := $(B)/deb/occamy-$(VERSION)
deb:
	rm -rf $(B)/deb
	mkdir -p $(DEB_SRC)
	tar -cf - --exclude=./.git --exclude='./build*' . | tar -C $(DEB_SRC) -xf -
	cd $(DEB_SRC) && dpkg-buildpackage -us -uc -b
	@ls $(B)/deb/*.deb

clean:
	rm -rf build build-asan build-tsan build-deb

-include $(shell find $(B) -name '*.d' 2>/dev/null)
