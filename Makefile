# doppel — real-time block replication and failover for Linux.
# `make` (or `make help`) lists the targets.

GO        ?= go
CLANG     ?= clang-14
BIN       := bin/doppel
GOFLAGS_STATIC := CGO_ENABLED=0
TEST_TIMEOUT ?= 25m
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
# -buildvcs=auto: the git revision in the binary (doppel --version) even
# where GOFLAGS turns VCS stamping off.
LDFLAGS   := -X main.version=$(VERSION)

# make install: PREFIX and DESTDIR as every Linux package expects.
PREFIX     ?= /usr/local
DESTDIR    ?=
BINDIR     ?= $(PREFIX)/bin
DATADIR    ?= $(PREFIX)/share
MANDIR     ?= $(DATADIR)/man
UNITDIR    ?= $(PREFIX)/lib/systemd/system
SYSCONFDIR ?= /etc
GENDIR     ?= bin

.DEFAULT_GOAL := help
.PHONY: help deps build static install uninstall generate check-generate vet check tidy-check staticcheck vulncheck test test-go test-race test-fuzz test-soak test-unit test-vm test-faults bench bench-nbd bench-repl bench-kernel bench-scale demo clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-15s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

deps: ## install what the tests need (Debian packages when missing, Go modules)
	@test/deps.sh
	$(GO) mod download

build: ## build bin/doppel
	$(GO) build -buildvcs=auto -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/doppel

static: ## build a static bin/doppel (for initramfs and VMs)
	$(GOFLAGS_STATIC) $(GO) build -trimpath -ldflags '-s -w $(LDFLAGS)' -o $(BIN) ./cmd/doppel

install: build ## install doppel, its man page, shell completions, the systemd unit and /etc/doppel/agent.yaml (PREFIX=/usr/local, DESTDIR)
	@mkdir -p $(GENDIR)
	$(BIN) man > $(GENDIR)/doppel.1
	$(BIN) completion bash > $(GENDIR)/doppel.bash
	$(BIN) completion zsh > $(GENDIR)/doppel.zsh
	$(BIN) completion fish > $(GENDIR)/doppel.fish
	sed 's|/usr/local/bin/doppel|$(BINDIR)/doppel|g' cmd/doppel/doppel-agent.service > $(GENDIR)/doppel-agent.service
	install -D -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/doppel
	install -D -m 0644 $(GENDIR)/doppel.1 $(DESTDIR)$(MANDIR)/man1/doppel.1
	install -D -m 0644 $(GENDIR)/doppel.bash $(DESTDIR)$(DATADIR)/bash-completion/completions/doppel
	install -D -m 0644 $(GENDIR)/doppel.zsh $(DESTDIR)$(DATADIR)/zsh/site-functions/_doppel
	install -D -m 0644 $(GENDIR)/doppel.fish $(DESTDIR)$(DATADIR)/fish/vendor_completions.d/doppel.fish
	install -D -m 0644 $(GENDIR)/doppel-agent.service $(DESTDIR)$(UNITDIR)/doppel-agent.service
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/doppel/agent.yaml ]; then \
	  echo "kept $(DESTDIR)$(SYSCONFDIR)/doppel/agent.yaml (the example is cmd/doppel/agent.yaml)"; \
	else \
	  echo "install -D -m 0644 cmd/doppel/agent.yaml $(DESTDIR)$(SYSCONFDIR)/doppel/agent.yaml"; \
	  install -D -m 0644 cmd/doppel/agent.yaml $(DESTDIR)$(SYSCONFDIR)/doppel/agent.yaml; \
	fi

uninstall: ## remove what make install installed (not /etc/doppel/agent.yaml, not /var/lib/doppel)
	rm -f $(DESTDIR)$(BINDIR)/doppel $(DESTDIR)$(MANDIR)/man1/doppel.1 \
	  $(DESTDIR)$(DATADIR)/bash-completion/completions/doppel $(DESTDIR)$(DATADIR)/zsh/site-functions/_doppel \
	  $(DESTDIR)$(DATADIR)/fish/vendor_completions.d/doppel.fish $(DESTDIR)$(UNITDIR)/doppel-agent.service

generate: ## regenerate the XDP probe's Go bindings and object (needs $(CLANG))
	@$(CLANG) --version | head -1
	cd ebpf && BPF2GO_CC=$(CLANG) BPF2GO_STRIP=$(subst clang,llvm-strip,$(CLANG)) $(GO) generate ./...

check-generate: generate ## fail if regenerating the eBPF bindings changes anything
	git diff --exit-code -- ebpf/
	@untracked="$$(git ls-files --others --exclude-standard -- ebpf/)"; test -z "$$untracked" || { echo "generated but not committed: $$untracked"; exit 1; }

vet: ## gofmt and go vet
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }
	$(GO) vet ./...

staticcheck: ## staticcheck (pinned in go.mod as a tool)
	$(GO) tool staticcheck ./...

tidy-check: ## fail if go mod tidy would change go.mod or go.sum
	@cp go.mod /tmp/doppel-go.mod.$$$$ && cp go.sum /tmp/doppel-go.sum.$$$$ && $(GO) mod tidy && \
	  if ! cmp -s go.mod /tmp/doppel-go.mod.$$$$ || ! cmp -s go.sum /tmp/doppel-go.sum.$$$$; then \
	    git --no-pager diff -- go.mod go.sum; cp /tmp/doppel-go.mod.$$$$ go.mod; cp /tmp/doppel-go.sum.$$$$ go.sum; \
	    rm -f /tmp/doppel-go.*.$$$$; echo "go mod tidy changes go.mod/go.sum: run it and commit"; exit 1; fi; \
	  rm -f /tmp/doppel-go.*.$$$$

# govulncheck, pinned; fetched by go run (not a module dependency).
GOVULNCHECK ?= golang.org/x/vuln/cmd/govulncheck@v1.10.0

vulncheck: ## govulncheck: known vulnerabilities reachable from the code (needs network: the module proxy and vuln.go.dev, so not part of make test)
	$(GO) run $(GOVULNCHECK) ./...

check: vet staticcheck tidy-check ## every static check CI runs (gofmt, vet, staticcheck, go mod tidy)

test: deps check test-go test-race test-fuzz ## what CI runs: static checks, every test tier this machine can run, the race detector, fuzz smoke

test-go: ## go test ./... (root tiers need root; the VM tier needs qemu)
	$(GO) test -timeout $(TEST_TIMEOUT) ./...

test-race: ## the unit tier under the race detector
	$(GO) test -race -short -timeout $(TEST_TIMEOUT) ./...

test-fuzz: ## every fuzz target for FUZZTIME (default 5s) beyond its seeds
	GO=$(GO) test/fuzz.sh

test-soak: ## the long soaks: no false down at 50 ms × 3 with every CPU busy, 2 minutes (root)
	DOPPEL_PROBE_SOAK=2m $(GO) test -count=1 -timeout 30m -run 'TestNoFalseDown' -v ./ebpf/heartbeat/

test-unit: ## unit tests only (no root, no network namespaces, no VMs)
	$(GO) test -short ./...

test-vm: deps ## the qemu VM tier alone (downloads a Debian kernel with apt-get download)
	$(GO) test -count=1 -timeout $(TEST_TIMEOUT) -v ./test/vm/...

test-faults: deps ## the fault suite's long seeded random schedules, sync and async (root, tens of minutes); DOPPEL_FAULT_SEEDS=1,2 replays seeds, DOPPEL_FAULT_COUNT=N faults per schedule, DOPPEL_FAULT_MODES=sync one mode
	DOPPEL_FAULTS=long $(GO) test -count=1 -timeout 85m -v -run '^TestFaultSchedule$$' ./test/faults/

bench: bench-nbd bench-repl bench-kernel bench-scale ## every benchmark; results go to bench/RESULTS.md

bench-nbd: deps build ## fio's nbd engine against doppel, nbdkit, qemu-nbd and go-nbd (~12 min; BENCH_FLAGS=-short for a quick check)
	$(GO) build -o bin/gonbd-serve ./bench/cmd/gonbd-serve
	$(GO) run ./bench/cmd/nbdbench -doppel $(BIN) -gonbd bin/gonbd-serve $(BENCH_FLAGS)

bench-repl: deps build ## fio through doppel async/sync vs QEMU's mirror, the two-copy limit and unreplicated; mirror vs nbdcopy (root, ~14 min)
	$(GO) run ./bench/cmd/replbench -doppel $(BIN) $(BENCH_FLAGS)

bench-kernel: deps ## fio on /dev/nbd0 (doppel nbd attach) against a loop device on the same volume, in a qemu guest (root, ~10 min); the table goes to bin/bench-kernel.md
	@mkdir -p bin
	DOPPEL_BENCH_KERNEL=full DOPPEL_BENCH_OUT=$(CURDIR)/bin/bench-kernel.md $(GO) test -count=1 -timeout 60m -run '^TestKernelPath$$' -v ./test/vm/

bench-scale: deps build ## 32 jobs between one agent pair: agents' RSS/CPU idle and loaded, resync after a 60 s target outage, failover of all 32 at once (root, ~4 min; BENCH_FLAGS=-short for a quick check)
	$(GO) run ./bench/cmd/scalebench -doppel $(BIN) $(BENCH_FLAGS)

demo: deps build ## two-host lab in network namespaces: protect, fail over, reverse, fail back (root)
	test/demo/demo.sh bin/doppel

clean: ## remove build output
	rm -rf bin
