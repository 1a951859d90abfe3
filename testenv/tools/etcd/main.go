// Command etcd is the etcd server, built from the version pinned in this
// tools module so that testenv needs no system etcd.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
