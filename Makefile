# StageFS — build, test, demo and install.
#   make demo     install what is needed, build, mount a demo volume and use it
#   make test     install what is needed, build, run every test
#   make fuzz     long differential POSIX run against ext4 (random seeds)
#   make build    release build of the stagefs binary (.build/release/stagefs)
#   make install PREFIX=/usr/local

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

# Thousands of differential POSIX sequences with random seeds (make test runs 300 fixed ones).
FUZZ_COUNT ?= 3000
fuzz: build
	python3 Tests/integration/posixdiff.py --engine both --count $(FUZZ_COUNT) --length 60 --stagefs-bin $(BIN)

demo: deps build
	./scripts/demo.sh $(BIN)

bench: build
	./bench/run.sh $(BIN)

SHARE := $(DESTDIR)$(PREFIX)/share/stagefs

install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/sbin $(DESTDIR)$(PREFIX)/lib/stagefs $(DESTDIR)$(PREFIX)/lib/systemd/system
	install -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/stagefs
	install -m 0755 scripts/mount.stagefs $(DESTDIR)$(PREFIX)/sbin/mount.stagefs
	install -m 0755 slurm/spank/spank_stagefs.so $(DESTDIR)$(PREFIX)/lib/stagefs/spank_stagefs.so
	sed 's|@PREFIX@|$(PREFIX)|g' systemd/stagefs@.service > $(DESTDIR)$(PREFIX)/lib/systemd/system/stagefs@.service
	install -d $(SHARE)/modulefiles/fs-client $(SHARE)/singularity $(SHARE)/slurm/prolog.d $(SHARE)/slurm/epilog.d $(SHARE)/slurm/plugstack.conf.d
	sed 's|@PREFIX@|$(PREFIX)|g' modulefiles/fs-client/0.1.0 > $(SHARE)/modulefiles/fs-client/0.1.0
	install -m 0644 modulefiles/fs-client/.version $(SHARE)/modulefiles/fs-client/.version
	install -m 0644 singularity/README.md singularity/apptainer.conf.snippet singularity/fuse.conf.note $(SHARE)/singularity/
	install -m 0644 slurm/README.md slurm/slurm.conf.snippet slurm/stagefs.env $(SHARE)/slurm/
	install -m 0644 slurm/plugstack.conf.d/stagefs.conf $(SHARE)/slurm/plugstack.conf.d/
	install -m 0755 slurm/prolog.d/stagefs.sh $(SHARE)/slurm/prolog.d/
	install -m 0755 slurm/epilog.d/stagefs.sh $(SHARE)/slurm/epilog.d/

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/stagefs $(DESTDIR)$(PREFIX)/sbin/mount.stagefs
	rm -f $(DESTDIR)$(PREFIX)/lib/stagefs/spank_stagefs.so $(DESTDIR)$(PREFIX)/lib/systemd/system/stagefs@.service
	rm -rf $(SHARE)
	-rmdir $(DESTDIR)$(PREFIX)/lib/stagefs $(DESTDIR)$(PREFIX)/lib/systemd/system $(DESTDIR)$(PREFIX)/lib/systemd \
		$(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/sbin $(DESTDIR)$(PREFIX)/share 2>/dev/null

format:
	$(SWIFT) format --in-place --recursive Sources Tests Package.swift

clean:
	rm -rf .build
	$(MAKE) -C slurm/spank clean
