# doppel — real-time block replication and failover for Linux.
# `make` (or `make help`) lists the targets.

GO        ?= go
CLANG     ?= clang-14
BIN       := bin/doppel
GOFLAGS_STATIC := CGO_ENABLED=0
TEST_TIMEOUT ?= 25m

.DEFAULT_GOAL := help
.PHONY: help deps build static generate check-generate vet check tidy-check staticcheck test test-go test-race test-fuzz test-unit test-vm bench bench-nbd bench-repl demo clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-15s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

deps: ## install what the tests need (Debian packages when missing, Go modules)
	@test/deps.sh
	$(GO) mod download

build: ## build bin/doppel
	$(GO) build -o $(BIN) ./cmd/doppel

static: ## build a static bin/doppel (for initramfs and VMs)
	$(GOFLAGS_STATIC) $(GO) build -trimpath -ldflags '-s -w' -o $(BIN) ./cmd/doppel

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

check: vet staticcheck tidy-check ## every static check CI runs (gofmt, vet, staticcheck, go mod tidy)

test: deps check test-go test-race test-fuzz ## what CI runs: static checks, every test tier this machine can run, the race detector, fuzz smoke

test-go: ## go test ./... (root tiers need root; the VM tier needs qemu)
	$(GO) test -timeout $(TEST_TIMEOUT) ./...

test-race: ## the unit tier under the race detector
	$(GO) test -race -short -timeout $(TEST_TIMEOUT) ./...

test-fuzz: ## every fuzz target for FUZZTIME (default 5s) beyond its seeds
	GO=$(GO) test/fuzz.sh

test-unit: ## unit tests only (no root, no network namespaces, no VMs)
	$(GO) test -short ./...

test-vm: deps ## the qemu VM tier alone (downloads a Debian kernel with apt-get download)
	$(GO) test -count=1 -timeout $(TEST_TIMEOUT) -v ./test/vm/...

bench: bench-nbd bench-repl ## every benchmark; results go to bench/RESULTS.md

bench-nbd: deps build ## fio's nbd engine against doppel, nbdkit, qemu-nbd and go-nbd (~12 min; BENCH_FLAGS=-short for a quick check)
	$(GO) build -o bin/gonbd-serve ./bench/cmd/gonbd-serve
	$(GO) run ./bench/cmd/nbdbench -doppel $(BIN) -gonbd bin/gonbd-serve $(BENCH_FLAGS)

bench-repl: deps build ## fio through a replicated export: unreplicated vs async vs sync, mirror vs nbdcopy (root, ~4 min)
	$(GO) run ./bench/cmd/replbench -doppel $(BIN) $(BENCH_FLAGS)

demo: deps build ## two-host lab in network namespaces: protect, fail over, reverse, fail back (root)
	test/demo/demo.sh bin/doppel

clean: ## remove build output
	rm -rf bin
