// containerd's own snapshotter conformance suite (snapshots/testsuite, containerd 1.6) run
// against the cafs snapshotter through containerd's proxy client, as containerd itself talks
// to it. Each test gets a fresh `python -m cafs snapshotter` process on its own root.
//
// Built in GOPATH mode against Debian's packaged sources (tests/test_snapshotter_conformance.py
// does it): GO111MODULE=off GOPATH=<tmp>:/usr/share/gocode go test -c. Run as root with
// -test.root, or the suite skips everything. $CAFS_PYTHON is the interpreter (default python3).
package conformance

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

const startTimeout = 60 * time.Second // ~20 interpreters start at once on a busy machine

func TestCafs(t *testing.T) {
	testsuite.SnapshotterSuite(t, "cafs", startCafs)
}

// startCafs serves a fresh cafs snapshotter on `root`, its socket, store and run dirs in a
// directory beside it (the suite removes both), and returns containerd's proxy client.
func startCafs(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	side := filepath.Join(filepath.Dir(root), "cafs")
	if err := os.MkdirAll(side, 0o700); err != nil {
		return nil, nil, err
	}
	socket := filepath.Join(side, "snapshotter.sock")
	python := os.Getenv("CAFS_PYTHON")
	if python == "" {
		python = "python3"
	}
	cmd := exec.Command(python, "-m", "cafs", "snapshotter", "--root", root, "--address", socket,
		"--store", "file://"+filepath.Join(side, "store"), "--no-mount-server",
		"--log-level", "warning")
	cmd.Env = append(os.Environ(),
		"CAFS_RUN_DIR="+filepath.Join(side, "run"),
		"CAFS_LOG_DIR="+filepath.Join(side, "log"),
		"CAFS_CACHE_DIR="+filepath.Join(side, "cache"))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	stop := func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
			return nil
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			return fmt.Errorf("cafs snapshotter on %s ignored SIGTERM for 30 s", root)
		}
	}
	if err := waitForSocket(socket, exited, cmd); err != nil {
		_ = stop()
		return nil, nil, err
	}
	conn, err := grpc.Dial("unix://"+socket,
		grpc.WithInsecure()) // Debian's grpc-go predates credentials/insecure
	if err != nil {
		_ = stop()
		return nil, nil, err
	}
	client := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "cafs")
	cleanup := func() error {
		conn.Close()
		return stop()
	}
	return client, cleanup, nil
}

func waitForSocket(socket string, exited <-chan struct{}, cmd *exec.Cmd) error {
	deadline := time.Now().Add(startTimeout)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("unix", socket); err == nil {
			c.Close()
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("cafs snapshotter exited before serving: %v", cmd.ProcessState)
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("cafs snapshotter not serving on %s after %s", socket, startTimeout)
}
