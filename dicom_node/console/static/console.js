// Refresh the worklist (counts, rows, paging) in place, without reloading the page, while it is open.
(function () {
  var list = document.getElementById("worklist");
  if (!list) { return; }
  var interval = parseInt(list.getAttribute("data-interval"), 10) || 3000;
  var problem = document.getElementById("refresh-problem");
  function show(message) {
    problem.textContent = message;
    problem.hidden = !message;
  }
  function refresh() {
    fetch(list.getAttribute("data-source"), {credentials: "same-origin", redirect: "manual"})
      .then(function (response) {
        if (!response.ok) {
          throw new Error(response.status === 401 || response.type === "opaqueredirect"
            ? "the session has ended: log in again" : "the node answered " + response.status);
        }
        return response.text();
      })
      .then(function (html) { list.innerHTML = html; show(""); })
      .catch(function (error) { show("The worklist is not refreshing: " + error.message + "."); });
  }
  window.setInterval(refresh, interval);
})();
