package main

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev/nbdclient"
	"github.com/doppelha/doppel/blockdev/nbdproto"
	"github.com/urfave/cli/v2"
)

func TestNbdServeRejectsBadInput(t *testing.T) {
	dir := t.TempDir()
	for _, args := range [][]string{
		{"--file", filepath.Join(dir, "x"), "--size", "lots"},
		{"--file", filepath.Join(dir, "x"), "--listen", "udp:1.2.3.4:5"},
		{"--file", filepath.Join(dir, "x"), "--listen", "/no/scheme.sock"},
		{"--file", filepath.Join(dir, "x"), "extra-arg"},
		{"--file", ""},
	} {
		err := run(context.Background(), append([]string{"doppel", "nbd", "serve"}, args...))
		var ec cli.ExitCoder
		if !errors.As(err, &ec) || ec.ExitCode() != exitUsage {
			t.Errorf("%q: %v, want a usage error (exit %d)", args, err, exitUsage)
		}
	}
	if err := run(context.Background(), []string{"doppel", "nbd", "serve", "--file", filepath.Join(dir, "missing"),
		"--read-only", "--listen", "unix:" + filepath.Join(dir, "s.sock")}); err == nil {
		t.Error("--read-only served a missing file")
	}
	// A missing file without --size is an error, not a usage error.
	if err := run(context.Background(), []string{"doppel", "nbd", "serve", "--file", filepath.Join(dir, "missing"),
		"--listen", "unix:" + filepath.Join(dir, "s.sock")}); err == nil || !strings.Contains(err.Error(), "no size") {
		t.Errorf("missing file without size: %v", err)
	}
}

func TestNbdServeEndToEnd(t *testing.T) {
	dir, err := os.MkdirTemp("", "dsrv")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	file := filepath.Join(dir, "vol.img")
	sock := filepath.Join(dir, "run", "nbd.sock")
	prof := filepath.Join(dir, "cpu.prof")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"doppel", "nbd", "serve", "--file", file, "--size", "16M",
			"--listen", "unix:" + sock, "--name", "vol", "--cpuprofile", prof})
	}()
	var cl *nbdclient.Client
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if cl, err = nbdclient.Dial("unix", sock, "vol"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("server not reachable: %v", err)
		}
	}
	if cl.Export.Size != 16<<20 || cl.Export.Flags&nbdproto.FlagSendFlush == 0 {
		t.Fatalf("export %+v", cl.Export)
	}
	if _, err := cl.WriteAt([]byte("persisted"), 4096); err != nil {
		t.Fatal(err)
	}
	cl.Close()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve returned %v after cancel", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("serve did not stop")
	}
	b, err := os.ReadFile(file)
	if err != nil || len(b) != 16<<20 || string(b[4096:4105]) != "persisted" {
		t.Fatalf("backing file: %d bytes, %v", len(b), err)
	}
	if _, err := os.Stat(sock); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("socket left behind: %v", err)
	}
	if fi, err := os.Stat(prof); err != nil || fi.Size() == 0 {
		t.Fatalf("cpu profile: %v", err)
	}
	// Read-only serving of the now existing file refuses writes.
	ctx2, cancel2 := context.WithCancel(context.Background())
	defer cancel2()
	go func() {
		done <- run(ctx2, []string{"doppel", "nbd", "serve", "--file", file, "--listen", "unix:" + sock, "--read-only"})
	}()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if cl, err = nbdclient.Dial("unix", sock, ""); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("read-only server not reachable: %v", err)
		}
	}
	if _, err := cl.WriteAt([]byte("x"), 0); err == nil {
		t.Fatal("write accepted by a read-only export")
	}
	cl.Close()
	cancel2()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
