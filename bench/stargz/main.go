// Command cafs-stargz-grpc serves Debian's packaged stargz-snapshotter library as a
// containerd proxy snapshotter, for the cafs benchmarks (bench/stargz.py builds it).
//
// Debian packages the library and ctr-remote but not upstream's daemon, whose CRI and
// kubeconfig keychains need Kubernetes Go packages that Debian lacks. This main keeps
// what a benchmark needs: credentials from the docker config file only, the library's
// in-memory metadata store, and the snapshotter served over gRPC on a unix socket.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/BurntSushi/toml"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	memorymetadata "github.com/containerd/stargz-snapshotter/metadata/memory"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/containerd/stargz-snapshotter/service/keychain/dockerconfig"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "", "unix socket to serve the snapshotter on (required)")
	root := flag.String("root", "", "directory for the snapshotter's state and caches (required)")
	configPath := flag.String("config", "", "optional TOML file with stargz-snapshotter's settings")
	logLevel := flag.String("log-level", "info", "trace, debug, info, warn, error")
	flag.Parse()
	if err := run(*address, *root, *configPath, *logLevel); err != nil {
		fmt.Fprintf(os.Stderr, "cafs-stargz-grpc: %v\n", err)
		os.Exit(1)
	}
}

func run(address, root, configPath, logLevel string) error {
	if address == "" || root == "" {
		return fmt.Errorf("--address and --root are required")
	}
	level, err := logrus.ParseLevel(logLevel)
	if err != nil {
		return fmt.Errorf("bad --log-level %q: %w", logLevel, err)
	}
	logrus.SetLevel(level)
	logrus.SetFormatter(&logrus.JSONFormatter{TimestampFormat: log.RFC3339NanoFixed})
	ctx := log.WithLogger(context.Background(), log.L)

	var config service.Config
	if configPath != "" {
		if _, err := toml.DecodeFile(configPath, &config); err != nil {
			return fmt.Errorf("config %s: %w", configPath, err)
		}
	}
	sn, err := service.NewStargzSnapshotterService(ctx, root, &config,
		service.WithCredsFuncs(dockerconfig.NewDockerconfigKeychain(ctx)),
		service.WithFilesystemOptions(stargzfs.WithMetadataStore(memorymetadata.NewReader)),
	)
	if err != nil {
		return fmt.Errorf("snapshotter: %w", err)
	}
	defer sn.Close()

	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		return err
	}
	if err := os.RemoveAll(address); err != nil {
		return err
	}
	listener, err := net.Listen("unix", address)
	if err != nil {
		return err
	}
	server := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(server, snapshotservice.FromSnapshotter(sn))
	served := make(chan error, 1)
	go func() { served <- server.Serve(listener) }()

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	select {
	case sig := <-signals:
		log.G(ctx).Infof("got %v, exiting", sig)
		server.Stop()
		return nil
	case err := <-served:
		return fmt.Errorf("serving %s: %w", address, err)
	}
}
