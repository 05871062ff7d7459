# Lazy twistd plugins: nothing of onion_twisted is imported until one is run.
from twisted.application.service import ServiceMaker

onionnode = ServiceMaker("onionnode", "onion_twisted.node.service", "An onion_twisted relay node.", "onionnode")
oniontracker = ServiceMaker("oniontracker", "onion_twisted.tracker.service",
                            "The onion_twisted tracker: directory, catalogue, bridges.", "oniontracker")
onionpeer = ServiceMaker("onionpeer", "onion_twisted.peer.service",
                         "An onion_twisted peer: shares and downloads files, serves its page.", "onionpeer")
