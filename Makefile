# StageFS — build, test, demo and install.
#   make demo     install what is needed, build, mount a demo volume and use it
#   make test     install what is needed, build, run every test
#   make fuzz     long differential POSIX run against ext4 (random seeds)
#   make bench    StageFS beside JuiceFS 1.4.2 on this machine, one table (bench/README.md)
#   make build    release build of the stagefs binary (.build/release/stagefs)
#   make install  PREFIX=/usr/local by default; DESTDIR= for packages (see install below)

PREFIX ?= /usr/local
SWIFT ?= swift
BIN := .build/release/stagefs

.PHONY: all deps build debug test unit-test integration-test demo install uninstall bench clean format fuzz

all: build

deps:
	./scripts/install-deps.sh

build:
	$(SWIFT) build -c release --product stagefs
	$(MAKE) -C slurm/spank

debug:
	$(SWIFT) build

unit-test:
	$(SWIFT) test

integration-test: build
	python3 -m pytest -q -p no:cacheprovider Tests/integration --stagefs-bin $(BIN)

test: deps build unit-test integration-test

# Thousands of differential POSIX sequences with random seeds (make test runs 300 fixed ones), then
# data-integrity sequences against a model (datafuzz.py; make test runs 3 fixed ones).
FUZZ_COUNT ?= 3000
fuzz: build
	python3 Tests/integration/posixdiff.py --engine both --count $(FUZZ_COUNT) --length 60 --stagefs-bin $(BIN)
	python3 Tests/integration/datafuzz.py --count $$(( $(FUZZ_COUNT) / 20 )) --steps 200 --stagefs-bin $(BIN)

demo: deps build
	./scripts/demo.sh $(BIN)

# StageFS beside JuiceFS 1.4.2 (fio, small files, listings, import, tar, staging, memory): one
# table, medians of 3 alternating rounds (bench/README.md). As root; under 20 minutes on 2 cores.
bench: deps build
	python3 bench/suite.py $(BIN)

# Install what `make build` built: `make build && sudo make install PREFIX=/opt/stagefs`.
# Only what is missing is built here, so that `make install` as root does not run a build that
# leaves root-owned files in .build (and a test can install a binary it already has: BIN=...).
# Text files that name install paths are templates: @PREFIX@ becomes PREFIX (never DESTDIR,
# which packagers set to stage files: `make install DESTDIR=/tmp/pkg PREFIX=/usr`).
# systemd reads units from /usr/lib/systemd/system and /usr/local/lib/systemd/system, not from
# other prefixes: there `systemctl link $(PREFIX)/lib/systemd/system/stagefs@.service` once, or
# install the unit into systemd's own directory with SYSTEMD_UNIT_DIR=/etc/systemd/system.
SHARE := $(DESTDIR)$(PREFIX)/share/stagefs
SPANK := slurm/spank/spank_stagefs.so
SYSTEMD_UNIT_DIR ?= $(PREFIX)/lib/systemd/system
UNIT_DIR := $(DESTDIR)$(SYSTEMD_UNIT_DIR)
TEMPLATE = sed 's|@PREFIX@|$(PREFIX)|g'

$(BIN):
	$(SWIFT) build -c release --product stagefs

$(SPANK): slurm/spank/spank_stagefs.c slurm/spank/spank_stagefs.map
	$(MAKE) -C slurm/spank

install: $(BIN) $(SPANK)
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/sbin $(DESTDIR)$(PREFIX)/lib/stagefs $(UNIT_DIR)
	install -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/stagefs
	install -m 0755 scripts/mount.stagefs $(DESTDIR)$(PREFIX)/sbin/mount.stagefs
	install -m 0755 $(SPANK) $(DESTDIR)$(PREFIX)/lib/stagefs/spank_stagefs.so
	$(TEMPLATE) systemd/stagefs@.service > $(UNIT_DIR)/stagefs@.service
	$(TEMPLATE) systemd/stagefs-gateway@.service > $(UNIT_DIR)/stagefs-gateway@.service
	install -d $(SHARE)/modulefiles/fs-client $(SHARE)/singularity $(SHARE)/slurm/prolog.d $(SHARE)/slurm/epilog.d $(SHARE)/slurm/plugstack.conf.d
	$(TEMPLATE) modulefiles/fs-client/0.1.0 > $(SHARE)/modulefiles/fs-client/0.1.0
	install -m 0644 modulefiles/fs-client/.version $(SHARE)/modulefiles/fs-client/.version
	install -m 0644 singularity/README.md singularity/apptainer.conf.snippet singularity/fuse.conf.note $(SHARE)/singularity/
	install -m 0644 slurm/README.md $(SHARE)/slurm/
	$(TEMPLATE) slurm/slurm.conf.snippet > $(SHARE)/slurm/slurm.conf.snippet
	$(TEMPLATE) slurm/stagefs.env > $(SHARE)/slurm/stagefs.env
	$(TEMPLATE) slurm/plugstack.conf.d/stagefs.conf > $(SHARE)/slurm/plugstack.conf.d/stagefs.conf
	$(TEMPLATE) slurm/prolog.d/stagefs.sh > $(SHARE)/slurm/prolog.d/stagefs.sh
	$(TEMPLATE) slurm/epilog.d/stagefs.sh > $(SHARE)/slurm/epilog.d/stagefs.sh
	chmod 0644 $(UNIT_DIR)/stagefs@.service $(UNIT_DIR)/stagefs-gateway@.service $(SHARE)/modulefiles/fs-client/0.1.0 $(SHARE)/slurm/slurm.conf.snippet \
		$(SHARE)/slurm/stagefs.env $(SHARE)/slurm/plugstack.conf.d/stagefs.conf
	chmod 0755 $(SHARE)/slurm/prolog.d/stagefs.sh $(SHARE)/slurm/epilog.d/stagefs.sh
	@case "$(SYSTEMD_UNIT_DIR)" in /etc/systemd/system|/usr/lib/systemd/system|/lib/systemd/system|/usr/local/lib/systemd/system) ;; \
	*) echo "stagefs: systemd does not read $(SYSTEMD_UNIT_DIR): run 'systemctl link $(SYSTEMD_UNIT_DIR)/stagefs@.service' once" ;; esac

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/stagefs $(DESTDIR)$(PREFIX)/sbin/mount.stagefs
	rm -f $(DESTDIR)$(PREFIX)/lib/stagefs/spank_stagefs.so $(UNIT_DIR)/stagefs@.service $(UNIT_DIR)/stagefs-gateway@.service
	rm -rf $(SHARE)
	-rmdir $(DESTDIR)$(PREFIX)/lib/stagefs $(DESTDIR)$(PREFIX)/lib/systemd/system $(DESTDIR)$(PREFIX)/lib/systemd \
		$(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/sbin $(DESTDIR)$(PREFIX)/share 2>/dev/null

format:
	$(SWIFT) format --in-place --recursive Sources Tests Package.swift

clean:
	rm -rf .build
	$(MAKE) -C slurm/spank clean
