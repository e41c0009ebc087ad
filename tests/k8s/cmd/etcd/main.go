// Command etcd is etcd's own server entry point (the go.etcd.io/etcd/v3 root module's
// main.go), built here so the etcd version follows go.etcd.io/etcd/server/v3 in go.mod,
// the version Kubernetes itself is tested against.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
