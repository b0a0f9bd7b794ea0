# StageFS — build, test, demo and install.
#   make demo     install what is needed, build, mount a demo volume and use it
#   make test     install what is needed, build, run every test
#   make build    release build of the stagefs binary (.build/release/stagefs)
#   make install PREFIX=/usr/local

PREFIX ?= /usr/local
SWIFT ?= swift
BIN := .build/release/stagefs

.PHONY: all deps build debug test unit-test integration-test demo install uninstall bench clean format

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

demo: deps build
	./scripts/demo.sh $(BIN)

bench: build
	./bench/run.sh $(BIN)

install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib/stagefs
	install -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/stagefs
	install -m 0755 slurm/spank/spank_stagefs.so $(DESTDIR)$(PREFIX)/lib/stagefs/spank_stagefs.so

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/stagefs $(DESTDIR)$(PREFIX)/lib/stagefs/spank_stagefs.so
	-rmdir $(DESTDIR)$(PREFIX)/lib/stagefs

format:
	$(SWIFT) format --in-place --recursive Sources Tests Package.swift

clean:
	rm -rf .build
	$(MAKE) -C slurm/spank clean
